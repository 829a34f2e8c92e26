# Code packages (kept) and user data (output files, large payloads; expiring), encrypted, private.

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV2_AWS_6:aws_s3_bucket_public_access_block.this blocks public access on every bucket (for_each)
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events; the grid records jobs in DynamoDB
  #checkov:skip=CKV_AWS_144:cross-region replication doubles cost; code is re-uploadable and outputs expire
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES-256) encrypts at rest; a KMS key would add a key policy to every presigned download
  #checkov:skip=CKV_AWS_21:only the code bucket is versioned; outputs and logs are transient and expire
  for_each      = toset(["code", "data", "logs"])
  bucket_prefix = "${var.name}-${each.key}-"
  force_destroy = each.key != "code"
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each                = aws_s3_bucket.this
  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this
  bucket   = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "code" {
  bucket = aws_s3_bucket.this["code"].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_logging" "this" {
  for_each      = toset(["code", "data"])
  bucket        = aws_s3_bucket.this[each.key].id
  target_bucket = aws_s3_bucket.this["logs"].id
  target_prefix = "${each.key}/"
}

resource "aws_s3_bucket_lifecycle_configuration" "code" {
  bucket = aws_s3_bucket.this["code"].id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.this["data"].id
  rule {
    id     = "expire-outputs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.output_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.this["logs"].id
  rule {
    id     = "expire-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = 90
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}
