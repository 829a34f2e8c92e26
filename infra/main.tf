# NanoGrid on AWS: the seed platform's architecture (controller, SQS, workers with warm pools,
# S3, DynamoDB, ElastiCache Redis, a private AI node), with VPC endpoints instead of a NAT gateway.

module "network" {
  source              = "./modules/network"
  name                = var.name
  region              = var.region
  vpc_cidr            = var.vpc_cidr
  flow_log_bucket_arn = module.storage.log_bucket_arn
  interface_endpoints = var.interface_endpoints
}

module "queue" {
  source = "./modules/queue"
  name   = var.name
}

module "storage" {
  source                = "./modules/storage"
  name                  = var.name
  output_retention_days = var.output_retention_days
}

module "registry" {
  source = "./modules/registry"
  name   = var.name
}

module "cache" {
  source     = "./modules/cache"
  name       = var.name
  vpc_id     = module.network.vpc_id
  subnet_ids = module.network.private_subnet_ids
  client_sgs = [module.network.controller_sg_id, module.network.worker_sg_id]
  node_type  = var.redis_node_type
}

module "iam" {
  source          = "./modules/iam"
  name            = var.name
  queue_arn       = module.queue.queue_arn
  dlq_arn         = module.queue.dlq_arn
  code_bucket_arn = module.storage.code_bucket_arn
  data_bucket_arn = module.storage.data_bucket_arn
  table_arn       = module.registry.table_arn
}

module "ai_node" {
  source        = "./modules/ai_node"
  count         = var.enable_ai_node ? 1 : 0
  name          = var.name
  vpc_id        = module.network.vpc_id
  subnet_id     = module.network.public_subnet_ids[0] # it downloads Ollama and models; ingress: workers only
  worker_sg_id  = module.network.worker_sg_id
  instance_type = var.ai_instance_type
  model         = var.ai_model
}

locals {
  # Written to /etc/nanogrid/env at every boot, never baked into an image.
  settings = {
    SQS_QUEUE_URL                 = module.queue.queue_url
    SQS_DLQ_URL                   = module.queue.dlq_url
    S3_CODE_BUCKET                = module.storage.code_bucket
    S3_USER_DATA_BUCKET           = module.storage.data_bucket
    DYNAMODB_TABLE                = module.registry.table_name
    REDIS_HOST                    = module.cache.address
    REDIS_PORT                    = tostring(module.cache.port)
    AI_ENDPOINT                   = var.enable_ai_node ? module.ai_node[0].endpoint : ""
    LLM_MODEL                     = var.ai_model
    AWS_DEFAULT_REGION            = var.region
    NANOGRID_CLOUDWATCH_NAMESPACE = "NanoGrid"
  }
}

module "controller" {
  source            = "./modules/controller"
  name              = var.name
  vpc_id            = module.network.vpc_id
  public_subnet_ids = module.network.public_subnet_ids
  subnet_ids        = module.network.private_subnet_ids
  security_group_id = module.network.controller_sg_id
  instance_profile  = module.iam.controller_profile
  instance_type     = var.controller_instance_type
  nanogrid_package  = var.nanogrid_package
  settings          = local.settings
  allowed_cidr      = var.allowed_cidr
  certificate_arn   = var.certificate_arn
}

module "workers" {
  source            = "./modules/workers"
  name              = var.name
  subnet_ids        = module.network.private_subnet_ids
  security_group_id = module.network.worker_sg_id
  instance_profile  = module.iam.worker_profile
  instance_type     = var.worker_instance_type
  nanogrid_package  = var.nanogrid_package
  settings          = local.settings
  min_size          = var.worker_min
  max_size          = var.worker_max
  backlog_target    = var.backlog_per_worker_target
}
