output "code_bucket" {
  description = "S3_CODE_BUCKET"
  value       = aws_s3_bucket.this["code"].id
}

output "code_bucket_arn" {
  description = "For IAM policies"
  value       = aws_s3_bucket.this["code"].arn
}

output "data_bucket" {
  description = "S3_USER_DATA_BUCKET"
  value       = aws_s3_bucket.this["data"].id
}

output "data_bucket_arn" {
  description = "For IAM policies"
  value       = aws_s3_bucket.this["data"].arn
}

output "log_bucket_arn" {
  description = "Access and flow logs"
  value       = aws_s3_bucket.this["logs"].arn
}
