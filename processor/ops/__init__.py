"""ams-ops: the operator's command line for a running deployment (dead letters, backfills).

It reads the same environment as the server and imports no model code, so it starts in a fraction of a second
on any machine that can reach RabbitMQ, the bucket and the API. `python -m processor.ops --help` lists the commands.
"""
