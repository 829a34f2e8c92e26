# Workers: an auto-scaling group tracking BacklogPerInstance (queued jobs per worker, published by
# the workers themselves), with a lifecycle hook so scale-in drains running jobs first.

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

resource "aws_launch_template" "this" {
  name_prefix   = "${var.name}-worker-"
  image_id      = data.aws_ssm_parameter.al2023.value
  instance_type = var.instance_type
  user_data = base64encode(templatefile("${path.root}/scripts/boot.sh.tftpl", {
    role = "worker", name = var.name, package = var.nanogrid_package, settings = var.settings
  }))
  iam_instance_profile {
    name = var.instance_profile
  }
  vpc_security_group_ids = [var.security_group_id]
  metadata_options {
    http_tokens            = "required"
    http_endpoint          = "enabled"
    instance_metadata_tags = "disabled"
  }
  monitoring {
    enabled = true
  }
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size = 30
      encrypted   = true
    }
  }
}

resource "aws_autoscaling_group" "this" {
  name                = "${var.name}-workers"
  min_size            = var.min_size
  max_size            = var.max_size
  vpc_zone_identifier = var.subnet_ids
  launch_template {
    id      = aws_launch_template.this.id
    version = "$Latest"
  }
  tag {
    key                 = "Name"
    value               = "${var.name}-worker"
    propagate_at_launch = true
  }
  initial_lifecycle_hook {
    name                 = "drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = 300
    default_result       = "CONTINUE"
  }
}

resource "aws_autoscaling_policy" "backlog" {
  name                   = "${var.name}-backlog-per-instance"
  autoscaling_group_name = aws_autoscaling_group.this.name
  policy_type            = "TargetTrackingScaling"
  target_tracking_configuration {
    target_value = var.backlog_target
    customized_metric_specification {
      metric_name = "BacklogPerInstance"
      namespace   = "NanoGrid"
      statistic   = "Average"
    }
  }
}
