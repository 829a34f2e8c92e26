output "group_name" {
  description = "The workers' auto-scaling group"
  value       = aws_autoscaling_group.this.name
}
