# The private AI node: Ollama on an instance reachable only from workers (its security group); it
# sits in a public subnet for outbound downloads of Ollama and models, with no inbound route but 11434 from workers.

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

resource "aws_security_group" "this" {
  name        = "${var.name}-ai"
  description = "Ollama, from workers only"
  vpc_id      = var.vpc_id
  ingress {
    description     = "Ollama API from workers"
    from_port       = 11434
    to_port         = 11434
    protocol        = "tcp"
    security_groups = [var.worker_sg_id]
  }
  egress {
    description = "Model downloads and updates"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_instance" "this" {
  #checkov:skip=CKV_AWS_88:the public address is for outbound model downloads; its security group admits only workers
  #checkov:skip=CKV2_AWS_41:the AI node calls no AWS API, so it gets no role
  ami                    = data.aws_ssm_parameter.al2023.value
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  associate_public_ip_address = true # outbound only (downloads): the security group admits workers alone
  vpc_security_group_ids = [aws_security_group.this.id]
  ebs_optimized          = true
  monitoring             = true
  user_data = templatefile("${path.module}/ollama.sh.tftpl", { model = var.model })
  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
  }
  root_block_device {
    volume_size = 60
    encrypted   = true
  }
  tags = { Name = "${var.name}-ai-node" }
}
