output "table_name" {
  description = "DYNAMODB_TABLE"
  value       = aws_dynamodb_table.this.name
}

output "table_arn" {
  description = "For IAM policies"
  value       = aws_dynamodb_table.this.arn
}
