variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "region" {
  description = "AWS region (for endpoint service names)"
  type        = string
}

variable "vpc_cidr" {
  description = "Address range of the VPC"
  type        = string
}

variable "flow_log_bucket_arn" {
  description = "Bucket for VPC flow logs of rejected traffic"
  type        = string
}

variable "interface_endpoints" {
  description = "AWS services reached through interface endpoints (about $9.50 a month each per zone)"
  type        = list(string)
}
