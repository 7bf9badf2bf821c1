#!/bin/sh
# One-shot MinIO set-up for docker-compose.yml: the bucket, and an AMQP notification (target "ams", configured
# on the minio service) for objects created or removed under the watched prefix. Safe to run again.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$BUCKET"
mc event add --ignore-existing "local/$BUCKET" arn:minio:sqs::AMS:amqp --event put,delete --prefix images/incoming/
mc event ls "local/$BUCKET"
