variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets"
  type        = list(string)
}

variable "security_group_id" {
  description = "Security group of the workers"
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

variable "min_size" {
  description = "Fewest workers"
  type        = number
}

variable "max_size" {
  description = "Most workers"
  type        = number
}

variable "backlog_target" {
  description = "Queued jobs per worker to aim for"
  type        = number
}
