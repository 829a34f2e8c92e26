output "controller_profile" {
  description = "Instance profile of the controller"
  value       = aws_iam_instance_profile.this["controller"].name
}

output "worker_profile" {
  description = "Instance profile of the workers"
  value       = aws_iam_instance_profile.this["worker"].name
}
