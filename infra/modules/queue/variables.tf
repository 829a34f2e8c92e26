variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "visibility_timeout" {
  description = "Seconds a taken job stays hidden; workers extend it while the job runs"
  type        = number
  default     = 30
}

variable "max_receives" {
  description = "Deliveries before a message goes to the dead-letter queue"
  type        = number
  default     = 3
}
