# The controller: an auto-scaling group of one behind a load balancer, whose DNS name is the
# grid's stable address; the group replaces an instance that fails /health.

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

resource "aws_launch_template" "this" {
  name_prefix   = "${var.name}-controller-"
  image_id      = data.aws_ssm_parameter.al2023.value
  instance_type = var.instance_type
  user_data = base64encode(templatefile("${path.root}/scripts/boot.sh.tftpl", {
    role = "controller", name = var.name, package = var.nanogrid_package, settings = var.settings
  }))
  iam_instance_profile {
    name = var.instance_profile
  }
  vpc_security_group_ids = [var.security_group_id]
  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
  }
  monitoring {
    enabled = true
  }
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size = 20
      encrypted   = true
    }
  }
}

resource "aws_security_group" "lb" {
  name        = "${var.name}-lb"
  description = "The controller's load balancer: HTTPS from the allowed range"
  vpc_id      = var.vpc_id
  ingress {
    description = "HTTPS from clients"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = [var.allowed_cidr]
  }
  egress {
    description = "To the controllers"
    from_port   = 8765
    to_port     = 8765
    protocol    = "tcp"
    security_groups = [var.security_group_id]
  }
}

resource "aws_security_group_rule" "from_lb" {
  description              = "Controller port from the load balancer"
  type                     = "ingress"
  from_port                = 8765
  to_port                  = 8765
  protocol                 = "tcp"
  security_group_id        = var.security_group_id
  source_security_group_id = aws_security_group.lb.id
}

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_91:Access logs need a bucket policy per region's ELB account; enable them with your log bucket
  #checkov:skip=CKV2_AWS_28:A WAF is an account-level choice; the controller checks API keys and rate-limits itself
  #checkov:skip=CKV_AWS_150:Deletion protection would block terraform destroy of a test grid; turn it on for production
  name                       = "${var.name}-controller"
  load_balancer_type         = "application"
  subnets                    = var.public_subnet_ids
  security_groups            = [aws_security_group.lb.id]
  drop_invalid_header_fields = true
  idle_timeout               = 120 # a sync /run answers within 60 s
}

resource "aws_lb_target_group" "this" {
  name     = "${var.name}-controller"
  port     = 8765
  protocol = "HTTP"
  vpc_id   = var.vpc_id
  health_check {
    path    = "/health"
    matcher = "200"
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
}

resource "aws_autoscaling_group" "this" {
  name                      = "${var.name}-controller"
  min_size                  = 1
  max_size                  = 1
  vpc_zone_identifier       = var.subnet_ids
  target_group_arns         = [aws_lb_target_group.this.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 300
  launch_template {
    id      = aws_launch_template.this.id
    version = "$Latest"
  }
  tag {
    key                 = "Name"
    value               = "${var.name}-controller"
    propagate_at_launch = true
  }
}
