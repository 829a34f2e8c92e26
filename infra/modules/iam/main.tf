# One role per kind of instance, each with only what its process calls.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "controller" {
  statement {
    sid       = "Queue"
    actions   = ["sqs:SendMessage", "sqs:GetQueueAttributes"]
    resources = [var.queue_arn]
  }
  statement {
    sid       = "Code"
    actions   = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"]
    resources = ["${var.code_bucket_arn}/*"]
  }
  statement {
    sid       = "Outputs"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${var.data_bucket_arn}/*"]
  }
  statement {
    sid = "Registry"
    actions = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
    "dynamodb:BatchWriteItem", "dynamodb:Scan", "dynamodb:Query"]
    resources = [var.table_arn]
  }
}

data "aws_iam_policy_document" "worker" {
  statement {
    sid = "Queue"
    actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes"]
    resources = [var.queue_arn, var.dlq_arn]
  }
  statement {
    sid       = "Code"
    actions   = ["s3:GetObject"]
    resources = ["${var.code_bucket_arn}/*"]
  }
  statement {
    sid       = "Outputs"
    actions   = ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"]
    resources = ["${var.data_bucket_arn}/*"]
  }
  statement {
    sid       = "Registry"
    actions   = ["dynamodb:GetItem", "dynamodb:UpdateItem"]
    resources = [var.table_arn]
  }
  statement {
    sid       = "Backlog"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"] # PutMetricData takes no resource; the condition pins the namespace
    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = ["NanoGrid"]
    }
  }
  statement {
    sid       = "Drain"
    actions   = ["autoscaling:CompleteLifecycleAction"]
    resources = ["arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/${var.name}-workers"]
  }
}

resource "aws_iam_role" "this" {
  for_each           = { controller = data.aws_iam_policy_document.controller, worker = data.aws_iam_policy_document.worker }
  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "this" {
  for_each = {
    controller = data.aws_iam_policy_document.controller.json
    worker     = data.aws_iam_policy_document.worker.json
  }
  name   = "${var.name}-${each.key}"
  role   = aws_iam_role.this[each.key].id
  policy = each.value
}

resource "aws_iam_role_policy_attachment" "ssm" {
  for_each   = aws_iam_role.this
  role       = each.value.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore" # shell access without SSH keys
}

resource "aws_iam_instance_profile" "this" {
  for_each = aws_iam_role.this
  name     = "${var.name}-${each.key}"
  role     = each.value.name
}
