output "url" {
  description = "The grid's address"
  value       = "https://${aws_lb.this.dns_name}"
}
