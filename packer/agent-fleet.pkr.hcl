# The agent-fleet AMI: Canonical's Ubuntu 24.04 (noble, default) or 22.04 (jammy), for
# x86_64 or arm64, with Docker, git, the Semaphore agent and toolbox, and agent-supervisor
# as a systemd service. One OS and arch per run:
#
#   packer init packer/
#   packer build -var os=ubuntu-noble -var arch=arm64 \
#     -var agent_sha256_arm64=<sha256 of agent_Linux_arm64.tar.gz> packer/
#
# or `agent-fleet ami build`, which also records the AMI in SSM at
# /agent-fleet/ami/<os>/<arch>, where the stacks' launch templates look it up.
#
# This file launches the builder, hands it one bundle (bootstrap/bundle.sh) and names and
# tags the AMI. Everything done on the builder is bootstrap/provision.sh; see
# bootstrap/README.md. The plugin requirement is in plugins.pkr.hcl.
#
# The image carries both job isolation levels (vm, strict); the stack's
# SEMAPHORE_AGENT_JOB_ISOLATION picks one at each instance's boot, so no variable here
# chooses sudo or Docker for the jobs.

variable "os" {
  type        = string
  default     = "ubuntu-noble"
  description = "ubuntu-noble (24.04) or ubuntu-jammy (22.04): the stack's SEMAPHORE_AGENT_OS."
  validation {
    condition     = contains(["ubuntu-noble", "ubuntu-jammy"], var.os)
    error_message = "The os variable must be ubuntu-noble or ubuntu-jammy."
  }
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "x86_64 or arm64: the stack's SEMAPHORE_AGENT_ARCH."
  validation {
    condition     = contains(["x86_64", "arm64"], var.arch)
    error_message = "The arch variable must be x86_64 or arm64."
  }
}

variable "region" {
  type        = string
  default     = env("AWS_REGION")
  description = "Region to build in (default: AWS_REGION)."
  validation {
    condition     = length(var.region) > 0
    error_message = "Set the region variable, or AWS_REGION."
  }
}

variable "instance_type" {
  type        = string
  default     = ""
  description = "Builder instance type. Empty: t3.large or t4g.large (compiling the supervisor wants the memory)."
}

variable "source_ami" {
  type        = string
  default     = ""
  description = "Start from this AMI (of the same OS and arch) instead of Canonical's newest."
}

variable "ami_name_prefix" {
  type    = string
  default = "agent-fleet"
}

variable "agent_version" {
  type        = string
  default     = "v2.4.0"
  description = "Semaphore agent release tag."
}

# The agent archive's sha256 per arch (agent_Linux_<arch>.tar.gz; the release's
# agent_checksums.txt lists them). No default on purpose: a build without the pin for
# its arch fails before installing anything.
variable "agent_sha256_x86_64" {
  type    = string
  default = ""
  validation {
    condition     = can(regex("^([0-9a-f]{64})?$", var.agent_sha256_x86_64))
    error_message = "The agent_sha256_x86_64 variable must be 64 lowercase hex digits."
  }
}

variable "agent_sha256_arm64" {
  type    = string
  default = ""
  validation {
    condition     = can(regex("^([0-9a-f]{64})?$", var.agent_sha256_arm64))
    error_message = "The agent_sha256_arm64 variable must be 64 lowercase hex digits."
  }
}

variable "toolbox_version" {
  type        = string
  default     = "v1.20.5"
  description = "Semaphore toolbox release tag."
}

# Optional pins of the toolbox archives (self-hosted-linux.tar, self-hosted-linux-arm.tar).
variable "toolbox_sha256_x86_64" {
  type    = string
  default = ""
}

variable "toolbox_sha256_arm64" {
  type    = string
  default = ""
}

variable "extra_packages" {
  type        = list(string)
  default     = []
  description = "More Ubuntu packages for the jobs."
}

variable "supervisor_binary" {
  type        = string
  default     = ""
  description = "A built agent-supervisor for the arch. Empty: built on the builder from this checkout."
}

variable "rust_toolchain" {
  type        = string
  default     = "1.95.0"
  description = "Rust toolchain for building the supervisor on the builder."
}

variable "manifest_path" {
  type        = string
  default     = ""
  description = "Where the manifest post-processor writes the AMI id. Empty: packer/out/manifest.json."
}

locals {
  # The OS names are the stack's (SEMAPHORE_AGENT_OS); Canonical's image names say
  # codename, release and Debian arch.
  ubuntu = {
    "ubuntu-noble" = { codename = "noble", release = "24.04" }
    "ubuntu-jammy" = { codename = "jammy", release = "22.04" }
  }
  deb_arch = { x86_64 = "amd64", arm64 = "arm64" }

  # agent-fleet's version, the workspace's in Cargo.toml; the supervisor built from this
  # checkout reports it, and provision.sh refuses a supervisor_binary that does not.
  version   = regex("(?m)^version = \"([^\"]+)\"", file("${path.root}/../Cargo.toml"))[0]
  timestamp = formatdate("YYYYMMDD-hhmmss", timestamp())

  instance_type  = var.instance_type != "" ? var.instance_type : (var.arch == "arm64" ? "t4g.large" : "t3.large")
  agent_sha256   = var.arch == "arm64" ? var.agent_sha256_arm64 : var.agent_sha256_x86_64
  toolbox_sha256 = var.arch == "arm64" ? var.toolbox_sha256_arm64 : var.toolbox_sha256_x86_64

  bundle   = "${path.root}/out/bundle-${var.os}-${var.arch}.tar.gz"
  manifest = var.manifest_path != "" ? var.manifest_path : "${path.root}/out/manifest.json"
  # Where `agent-fleet ami` records the AMI; the launch templates resolve
  # resolve:ssm:/agent-fleet/ami/<Os>/<Arch>.
  ssm_parameter = "/agent-fleet/ami/${var.os}/${var.arch}"
}

source "amazon-ebs" "agent" {
  region        = var.region
  instance_type = local.instance_type
  ssh_username  = "ubuntu"
  # Packer's temporary security group admits SSH from this machine's address only,
  # not from 0.0.0.0/0.
  temporary_security_group_source_public_ip = true

  source_ami = var.source_ami
  dynamic "source_ami_filter" {
    for_each = var.source_ami == "" ? [1] : []
    content {
      owners      = ["099720109477"] # Canonical
      most_recent = true
      filters = {
        # ubuntu/images/ holds the server images (not minimal, not Pro); hvm-ssd* covers
        # jammy's hvm-ssd and noble's hvm-ssd-gp3.
        name                = "ubuntu/images/hvm-ssd*/ubuntu-${local.ubuntu[var.os].codename}-${local.ubuntu[var.os].release}-${local.deb_arch[var.arch]}-server-*"
        architecture        = var.arch
        root-device-type    = "ebs"
        virtualization-type = "hvm"
      }
    }
  }

  # The builder speaks IMDSv2 only, as the fleet's instances do; and instances launched
  # from the AMI default to IMDSv2 even without a launch template saying so.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  ami_name        = "${var.ami_name_prefix}-${local.version}-${var.os}-${var.arch}-${local.timestamp}"
  ami_description = "agent-fleet ${local.version}: ${var.os} ${var.arch}, Semaphore agent ${var.agent_version}, toolbox ${var.toolbox_version}"
  tags = {
    Name              = "${var.ami_name_prefix}-${local.version}-${var.os}-${var.arch}"
    Project           = "agent-fleet"
    Version           = local.version
    OS                = var.os
    Arch              = var.arch
    AgentVersion      = var.agent_version
    ToolboxVersion    = var.toolbox_version
    SupervisorVersion = local.version
    SourceAmi         = "{{ .SourceAMI }}"
    SourceAmiName     = "{{ .SourceAMIName }}"
    SsmParameter      = local.ssm_parameter
  }
  snapshot_tags = {
    Name    = "${var.ami_name_prefix}-${local.version}-${var.os}-${var.arch}"
    Project = "agent-fleet"
  }
  run_tags = {
    Name    = "agent-fleet AMI builder (${var.os} ${var.arch})"
    Project = "agent-fleet"
  }
}

build {
  name    = "agent-fleet"
  sources = ["source.amazon-ebs.agent"]

  # On this machine: bootstrap/ plus the supervisor (source, or supervisor_binary).
  provisioner "shell-local" {
    environment_vars = [
      "BUNDLE=${local.bundle}",
      "SUPERVISOR_BINARY=${var.supervisor_binary}",
    ]
    inline = ["\"${path.root}/../bootstrap/bundle.sh\" \"$BUNDLE\" \"$SUPERVISOR_BINARY\""]
  }

  provisioner "file" {
    source      = local.bundle
    destination = "/tmp/agent-fleet.tar.gz"
    # Made by the step above, so it need not exist when the template is validated.
    generated = true
  }

  provisioner "shell" {
    environment_vars = [
      "AGENT_FLEET_IMAGE_BUILD=yes",
      "ARCH=${var.arch}",
      "AGENT_VERSION=${var.agent_version}",
      "AGENT_SHA256=${local.agent_sha256}",
      "TOOLBOX_VERSION=${var.toolbox_version}",
      "TOOLBOX_SHA256=${local.toolbox_sha256}",
      "EXTRA_PACKAGES=${join(" ", var.extra_packages)}",
      "SUPERVISOR_BINARY=${var.supervisor_binary != "" ? "/tmp/agent-fleet/bin/agent-supervisor" : ""}",
      "SUPERVISOR_VERSION=${local.version}",
      "RUST_TOOLCHAIN=${var.rust_toolchain}",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }}"
    inline = [
      "set -euo pipefail",
      "rm -rf /tmp/agent-fleet && mkdir /tmp/agent-fleet",
      "tar -xzf /tmp/agent-fleet.tar.gz -C /tmp/agent-fleet",
      "/tmp/agent-fleet/bootstrap/provision.sh all",
      "rm -rf /tmp/agent-fleet /tmp/agent-fleet.tar.gz",
    ]
  }

  # The AMI id for `agent-fleet ami build` to record at custom_data.ssm_parameter.
  post-processor "manifest" {
    output     = local.manifest
    strip_path = true
    custom_data = {
      os            = var.os
      arch          = var.arch
      version       = local.version
      ssm_parameter = local.ssm_parameter
    }
  }
}
