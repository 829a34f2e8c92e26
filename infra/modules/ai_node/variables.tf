variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "vpc_id" {
  description = "The VPC"
  type        = string
}

variable "subnet_id" {
  description = "A subnet with outbound internet access (for downloads)"
  type        = string
}

variable "worker_sg_id" {
  description = "Security group of the workers (the only clients)"
  type        = string
}

variable "instance_type" {
  description = "Instance type"
  type        = string
}

variable "model" {
  description = "Model pulled at boot"
  type        = string
}
