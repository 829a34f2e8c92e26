output "endpoint" {
  description = "AI_ENDPOINT"
  value       = "http://${aws_instance.this.private_ip}:11434"
}
