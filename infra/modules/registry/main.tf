# Functions, jobs and API keys in one table; job items expire through TTL on expires_at.

resource "aws_dynamodb_table" "this" {
  #checkov:skip=CKV_AWS_119:encrypted at rest with the AWS-owned key; a customer key adds cost and a key policy to manage
  name         = "${var.name}-registry"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "pk"
  attribute {
    name = "pk"
    type = "S"
  }
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }
  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled = true
  }
}
