"""One-shot setup of the compose stack: Prefect Secret blocks for the model keys, and (events
overlay) buckets plus the S3 → SQS bucket notification that `radflow bridge` consumes."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main", "notifications", "secrets"]

# Secret block → environment variable; deployments/prefect.yaml resolves the blocks by name.
SECRET_BLOCKS = {
    "radflow-openai-api-key": "OPENAI_API_KEY",
    "radflow-anthropic-api-key": "ANTHROPIC_API_KEY",
}


def secrets() -> None:
    """Save each key from the environment as a Prefect Secret block (values never printed)."""
    from prefect.blocks.system import Secret

    for block, env in SECRET_BLOCKS.items():
        value = os.environ.get(env)
        if not value:
            raise SystemExit(f"{env} is not set: it becomes the Secret block {block}")
        Secret(value=value).save(block, overwrite=True)
        print(f"secret block {block} saved from ${env}")


def notifications(bucket: str, output_bucket: str, queue: str) -> None:
    """Create the buckets and the queue, allow S3 to send, and notify on ObjectCreated."""
    import boto3

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    for name in (bucket, output_bucket):
        s3.create_bucket(Bucket=name)
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}},
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    print(f"s3://{bucket} ObjectCreated → {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("secrets", help="model keys → Prefect Secret blocks")
    note = sub.add_parser("notifications", help="buckets + S3 → SQS notification")
    note.add_argument("--bucket", required=True)
    note.add_argument("--output-bucket", required=True)
    note.add_argument("--queue", required=True)
    args = parser.parse_args(argv)
    if args.command == "secrets":
        secrets()
    else:
        notifications(args.bucket, args.output_bucket, args.queue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
