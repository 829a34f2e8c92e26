variable "name" {
  description = "Prefix of every resource name"
  type        = string
  default     = "nanogrid"
}

variable "region" {
  description = "AWS region"
  type        = string
  default     = "ap-northeast-2"
}

variable "vpc_cidr" {
  description = "Address range of the VPC"
  type        = string
  default     = "10.0.0.0/16"
}

variable "nanogrid_package" {
  description = "What the instances pip-install: a wheel URL in the code bucket, a git URL or a version"
  type        = string
}

variable "controller_instance_type" {
  description = "Controller instance type"
  type        = string
  default     = "t3.small"
}

variable "worker_instance_type" {
  description = "Worker instance type"
  type        = string
  default     = "t3.small"
}

variable "worker_min" {
  description = "Fewest workers"
  type        = number
  default     = 1
}

variable "worker_max" {
  description = "Most workers"
  type        = number
  default     = 4
}

variable "backlog_per_worker_target" {
  description = "Queued jobs per worker the auto-scaling group aims for"
  type        = number
  default     = 20
}

variable "ai_instance_type" {
  description = "AI node instance type (Ollama); 0 AI nodes with enable_ai_node = false"
  type        = string
  default     = "t3.large"
}

variable "enable_ai_node" {
  description = "Run the private AI node"
  type        = bool
  default     = true
}

variable "ai_model" {
  description = "Model the AI node pulls at boot and functions get by default (LLM_MODEL)"
  type        = string
  default     = "llama3.2:1b"
}

variable "redis_node_type" {
  description = "ElastiCache node type"
  type        = string
  default     = "cache.t3.micro"
}

variable "allowed_cidr" {
  description = "Who may reach the controller's load balancer"
  type        = string
  default     = "0.0.0.0/0"
}

variable "certificate_arn" {
  description = "ACM certificate for the HTTPS listener"
  type        = string
}

variable "output_retention_days" {
  description = "Days before output files expire"
  type        = number
  default     = 14
}

variable "interface_endpoints" {
  description = "Services private instances reach without a NAT; add ssm, ssmmessages, ec2messages for shell access"
  type        = list(string)
  default     = ["sqs", "monitoring", "autoscaling"]
}
