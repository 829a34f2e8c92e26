# Redis for results, cancel requests, heartbeats and rate limits: reachable only from the
# controller and worker security groups.

resource "aws_elasticache_subnet_group" "this" {
  name       = "${var.name}-redis"
  subnet_ids = var.subnet_ids
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "Redis, from controllers and workers only"
  vpc_id      = var.vpc_id
  ingress {
    description     = "Redis from controllers and workers"
    from_port       = 6379
    to_port         = 6379
    protocol        = "tcp"
    security_groups = var.client_sgs
  }
}

resource "aws_elasticache_cluster" "this" {
  #checkov:skip=CKV_AWS_134:Redis holds only transient results and heartbeats; the registry has the durable state
  cluster_id           = "${var.name}-redis"
  engine               = "redis"
  node_type            = var.node_type
  num_cache_nodes      = 1
  parameter_group_name = "default.redis7"
  port                 = 6379
  subnet_group_name    = aws_elasticache_subnet_group.this.name
  security_group_ids   = [aws_security_group.redis.id]
}
