output "vpc_id" {
  description = "The VPC"
  value       = aws_vpc.this.id
}

output "public_subnet_ids" {
  description = "Subnets of the load balancer"
  value       = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  description = "Subnets of the instances and Redis"
  value       = aws_subnet.private[*].id
}

output "controller_sg_id" {
  description = "Security group of the controller instances"
  value       = aws_security_group.controller.id
}

output "worker_sg_id" {
  description = "Security group of the worker instances"
  value       = aws_security_group.worker.id
}
