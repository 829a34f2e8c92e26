# The job queue and its dead-letter queue: a message delivered max_receives times without being
# deleted (its workers died, or its sandbox crashed each time) moves to the DLQ, where a worker
# reports the job failed with the reason.

resource "aws_sqs_queue" "dlq" {
  name                      = "${var.name}-task-dlq"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "tasks" {
  name                       = "${var.name}-task-queue"
  visibility_timeout_seconds = var.visibility_timeout
  receive_wait_time_seconds  = 20
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq.arn
    maxReceiveCount     = var.max_receives
  })
}
