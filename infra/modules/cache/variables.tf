variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "vpc_id" {
  description = "The VPC"
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets"
  type        = list(string)
}

variable "client_sgs" {
  description = "Security groups allowed to connect"
  type        = list(string)
}

variable "node_type" {
  description = "ElastiCache node type"
  type        = string
}
