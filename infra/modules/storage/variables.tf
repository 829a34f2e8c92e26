variable "name" {
  description = "Prefix of resource names"
  type        = string
}

variable "output_retention_days" {
  description = "Days before output files expire"
  type        = number
}
