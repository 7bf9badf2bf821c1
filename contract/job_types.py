"""The message types of the jobs this server runs (each is also its AMQP `type` and its routing key)."""

IMAGE_INDEX = "image.index"
IMAGE_GENERATE = "image.generate"
VOICE_GENERATE = "voice.generate"
IMAGE_DELETE = "image.delete"
IMAGE_EMBED = "image.embed"
