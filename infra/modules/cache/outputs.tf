output "address" {
  description = "REDIS_HOST"
  value       = aws_elasticache_cluster.this.cache_nodes[0].address
}

output "port" {
  description = "REDIS_PORT"
  value       = aws_elasticache_cluster.this.port
}
