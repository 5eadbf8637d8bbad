# The Amazon plugin, which Packer 1.10 and later no longer bundle: `packer init packer/`
# installs it (older Packers are not tried). The block has a file of its own because
# Packer before 1.7 cannot parse `required_plugins`, and the only Packer the test
# machines have is Debian's 1.6.6: bootstrap/test.sh gives it agent-fleet.pkr.hcl alone.
packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
