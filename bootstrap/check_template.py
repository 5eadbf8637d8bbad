#!/usr/bin/env python3
"""Checks of packer/*.pkr.hcl that the Packer here cannot make.

Debian's Packer (1.6.6) knows neither `required_plugins` nor the amazon plugin's newer
options, and its `validate -syntax-only` resolves no reference. So this parses the
templates with python-hcl2 and checks what a typo would break: references, the files
the template runs or uploads, the settings it hands provision.sh, the OS/arch names the
stack resolves the AMI by, and the builder's security settings.

Usage: check_template.py REPO_ROOT. Prints a line per check; exits 1 if any failed.
"""

import fnmatch
import re
import sys
from pathlib import Path

import hcl2

REPO = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
failed = 0


def check(ok, what, detail=""):
    global failed
    print(f"{'ok  ' if ok else 'FAIL'}  template: {what}" + ("" if ok else f": {detail}"))
    failed += not ok


def load(path):
    opts = hcl2.SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=True
    )
    with open(path) as f:
        return hcl2.load(f, serialization_options=opts)


main_path = REPO / "packer/agent-fleet.pkr.hcl"
docs = {}
for p in sorted((REPO / "packer").glob("*.pkr.hcl")):
    try:
        docs[p.name] = load(p)
        check(True, f"{p.name} parses")
    except Exception as e:  # the parser's own message says where
        check(False, f"{p.name} parses", e)
if failed or main_path.name not in docs:
    sys.exit(1)
tpl = docs[main_path.name]
text = main_path.read_text()

plugins = [b for d in docs.values() for b in d.get("packer", [])]
amazon = [p.get("amazon", {}) for b in plugins for p in b.get("required_plugins", [])]
check(any(a.get("source") == "github.com/hashicorp/amazon" for a in amazon),
      "requires the amazon plugin", f"required_plugins: {amazon}")

variables = {name: v for block in tpl["variable"] for name, v in block.items()}
local_vals = {k: v for block in tpl["locals"] for k, v in block.items()}
for kind, declared in (("var", variables), ("local", local_vals)):
    used = set(re.findall(rf"\b{kind}\.([A-Za-z0-9_]+)", text))
    check(used <= declared.keys(), f"every {kind}.X is declared", sorted(used - declared.keys()))


def allowed(var):
    """The list in a variable's `contains([...], var.x)` validation."""
    cond = variables[var]["validation"][0]["condition"]
    return set(re.findall(r'"([^"]+)"', cond.split("]")[0]))


# The names the stack resolves resolve:ssm:/agent-fleet/ami/<Os>/<Arch> with.
cfn = (REPO / "cfn/agent-fleet.yaml").read_text()
ami_rs = (REPO / "stack/src/ami.rs").read_text()
for var, param, const in (("os", "Os", "OSES"), ("arch", "Arch", "ARCHES")):
    m = re.search(rf"^  {param}:\n(?:    .*\n)*?    AllowedValues: \[([^\]]*)\]", cfn, re.M)
    in_cfn = {s.strip() for s in m.group(1).split(",")} if m else set()
    m = re.search(rf"{const}: &\[&str\] = &\[([^\]]*)\]", ami_rs)
    in_cli = set(re.findall(r'"([^"]+)"', m.group(1))) if m else set()
    check(allowed(var) == in_cfn == in_cli, f"{var} values match the template's {param} and `agent-fleet ami`",
          f"packer {sorted(allowed(var))}, cfn {sorted(in_cfn)}, ami.rs {sorted(in_cli)}")
check(local_vals["ssm_parameter"] == "/agent-fleet/ami/${var.os}/${var.arch}"
      and "resolve:ssm:/agent-fleet/ami/${Os}/${Arch}" in cfn,
      "SSM parameter is the one the launch templates resolve", local_vals["ssm_parameter"])

# Canonical's image names, one per OS and arch, and near misses that must not match.
src = tpl["source"][0]["amazon-ebs"]["agent"]
flt = src["dynamic"][0]["source_ami_filter"]["content"][0]
examples = {
    ("ubuntu-noble", "x86_64"): "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250305",
    ("ubuntu-noble", "arm64"): "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-20250305",
    ("ubuntu-jammy", "x86_64"): "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20240207.1",
    ("ubuntu-jammy", "arm64"): "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-arm64-server-20240207.1",
}
near_misses = ["ubuntu-minimal/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-minimal-20250305",
               "ubuntu/images-testing/hvm-ssd-gp3/ubuntu-noble-daily-amd64-server-20250305",
               "ubuntu-pro-server/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-pro-server-20250305"]
for (os_, arch), name in examples.items():
    u = local_vals["ubuntu"][os_]
    pattern = (flt["filters"]["name"]
               .replace("${local.ubuntu[var.os].codename}", u["codename"])
               .replace("${local.ubuntu[var.os].release}", u["release"])
               .replace("${local.deb_arch[var.arch]}", local_vals["deb_arch"][arch]))
    others = [n for n in list(examples.values()) + near_misses if n != name]
    check(fnmatch.fnmatchcase(name, pattern) and not any(fnmatch.fnmatchcase(n, pattern) for n in others),
          f"{os_} {arch} picks Canonical's server image", pattern)
check(flt["owners"] == ["099720109477"] and flt["filters"]["architecture"] == "${var.arch}",
      "source images are Canonical's, of the build's arch", flt)

md = src["metadata_options"][0]
check(md.get("http_tokens") == "required" and src.get("imds_support") == "v2.0",
      "builder and AMI require IMDSv2", md)
check(src.get("temporary_security_group_source_public_ip") is True,
      "builder's SSH is not open to the world")
tags = src["tags"]
wanted = {"Version", "OS", "Arch", "AgentVersion", "ToolboxVersion", "SupervisorVersion", "SourceAmi"}
check(wanted <= tags.keys(), "AMI tags say what is inside", sorted(wanted - tags.keys()))

# The project version the AMI is named after, read from Cargo.toml as the template does.
m = re.search(r'regex\("((?:[^"\\]|\\.)*)"', local_vals["version"])
version = re.search(m.group(1).replace('\\"', '"'), (REPO / "Cargo.toml").read_text()) if m else None
check(bool(version), "version comes out of Cargo.toml", local_vals["version"])
if version:
    print(f"      (agent-fleet {version.group(1)})")

# Every file of this checkout the template names exists; the one it uploads is made by
# the shell-local step and must say so (generated = true).
for rel in sorted(set(re.findall(r"\$\{path\.root\}/\.\./([A-Za-z0-9_./-]+)", text))):
    p = REPO / rel
    check(p.is_file() and (not rel.endswith(".sh") or p.stat().st_mode & 0o111), f"{rel} exists")
provisioners = {k: v for p in tpl["build"][0]["provisioner"] for k, v in p.items()}
upload = provisioners["file"]
check(upload["source"] == "${local.bundle}" and upload.get("generated") is True,
      "the upload is the bundle, made during the build", upload)

# What the template hands provision.sh is what provision.sh reads.
script = (REPO / "bootstrap/provision.sh").read_text()
names = [e.split("=", 1)[0] for e in provisioners["shell"]["environment_vars"]]
unread = [n for n in names if not re.search(rf"\$\{{{n}:-", script)]
check(not unread, "every setting passed to provision.sh is one it reads", unread)
check("provision.sh all" in " ".join(provisioners["shell"]["inline"]), "the builder runs provision.sh all")

pp = tpl["build"][0]["post-processor"][0]["manifest"]
check(pp["output"] == "${local.manifest}", "a manifest records the AMI id", pp)

sys.exit(1 if failed else 0)
