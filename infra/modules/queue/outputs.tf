output "queue_url" {
  description = "SQS_QUEUE_URL"
  value       = aws_sqs_queue.tasks.url
}

output "queue_arn" {
  description = "For IAM policies"
  value       = aws_sqs_queue.tasks.arn
}

output "dlq_url" {
  description = "SQS_DLQ_URL"
  value       = aws_sqs_queue.dlq.url
}

output "dlq_arn" {
  description = "For IAM policies"
  value       = aws_sqs_queue.dlq.arn
}
