variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "vpc_id" {
  description = "The VPC"
  type        = string
}

variable "public_subnet_ids" {
  description = "Subnets of the load balancer"
  type        = list(string)
}

variable "subnet_ids" {
  description = "Private subnets of the controller instance"
  type        = list(string)
}

variable "security_group_id" {
  description = "Security group of the controller instances"
  type        = string
}

variable "instance_profile" {
  description = "IAM instance profile"
  type        = string
}

variable "instance_type" {
  description = "Instance type"
  type        = string
}

variable "nanogrid_package" {
  description = "What to pip-install"
  type        = string
}

variable "settings" {
  description = "Environment written to /etc/nanogrid/env at boot"
  type        = map(string)
}

variable "allowed_cidr" {
  description = "Who may reach the load balancer"
  type        = string
}

variable "certificate_arn" {
  description = "ACM certificate for HTTPS"
  type        = string
}
