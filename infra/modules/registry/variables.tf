variable "name" {
  description = "Prefix of resource names"
  type        = string
}
