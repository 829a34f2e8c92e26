variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "queue_arn" {
  description = "The job queue"
  type        = string
}

variable "dlq_arn" {
  description = "The dead-letter queue"
  type        = string
}

variable "code_bucket_arn" {
  description = "The code bucket"
  type        = string
}

variable "data_bucket_arn" {
  description = "The user-data bucket"
  type        = string
}

variable "table_arn" {
  description = "The registry table"
  type        = string
}
