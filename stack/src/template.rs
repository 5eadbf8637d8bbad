//! The template as sent to CloudFormation: `cfn/agent-fleet.yaml` without its full-line
//! comments and blank lines.
//!
//! CloudFormation takes at most 51,200 bytes of `TemplateBody`; the commented template is
//! close to that (or above it), and the comments are for people, not for CloudFormation.
//! Block scalars (`|`, `>`) are copied as they are: the user data's `#!/bin/sh` and comment
//! lines are part of its value. Tests prove that the minified body parses to exactly the same
//! document as the file.

use crate::TEMPLATE;

/// The body a deploy sends.
pub fn body() -> String {
    without_console_docs(&minify(TEMPLATE))
}

/// Drops what only the CloudFormation console shows: the top-level `Metadata` (its
/// parameter groups) and every parameter's `Description`. The CLI is how this body is
/// deployed and documents every setting itself (`agent-fleet vars`, the README); the file,
/// uploaded whole (through S3, it is above the body limit), keeps them for the console.
pub fn without_console_docs(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    let mut section = "";
    // Skipping every line indented more than this (the dropped key's value).
    let mut skip_deeper_than: Option<usize> = None;
    for line in yaml.lines() {
        let content = line.trim_start();
        let indent = line.len() - content.len();
        if let Some(depth) = skip_deeper_than {
            if content.is_empty() || indent > depth {
                continue;
            }
            skip_deeper_than = None;
        }
        if indent == 0 && !content.is_empty() {
            section = content.split(':').next().unwrap_or_default();
            if section == "Metadata" {
                skip_deeper_than = Some(0);
                continue;
            }
        }
        if section == "Parameters" && indent == 4 && content.starts_with("Description:") {
            skip_deeper_than = Some(4);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Drops full-line comments and blank lines outside block scalars.
pub fn minify(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    // The indentation of the line that opened the block scalar being copied: every line
    // indented more than it (and every blank line) belongs to the scalar.
    let mut block: Option<usize> = None;
    // Blank lines seen inside it, written once more content follows; `keep`: its chomping
    // indicator is `+`, so trailing blank lines belong to the value.
    let mut blanks = 0;
    let mut keep = false;
    for line in yaml.lines() {
        let content = line.trim_start();
        let indent = line.len() - content.len();
        if let Some(parent) = block {
            if content.is_empty() {
                blanks += 1;
                continue;
            }
            if indent > parent {
                (0..blanks).for_each(|_| out.push('\n'));
                blanks = 0;
                out.push_str(line);
                out.push('\n');
                continue;
            }
            // Trailing blank lines of a clipped or stripped scalar are not part of its value.
            if keep {
                (0..blanks).for_each(|_| out.push('\n'));
            }
            blanks = 0;
            block = None;
        }
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if opens_block_scalar(content) {
            block = Some(indent);
            keep = content.ends_with('+') || content.contains("+ ");
        }
    }
    out
}

/// `key: |`, `- >-`, `Fn::Base64: !Sub |`: the line's last token is a block indicator.
fn opens_block_scalar(content: &str) -> bool {
    content.split_whitespace().next_back().is_some_and(|last| {
        let mut chars = last.chars();
        matches!(chars.next(), Some('|' | '>')) && chars.all(|c| matches!(c, '-' | '+' | '1'..='9'))
    }) && (content.contains(": ") || content.starts_with("- ") || content == "|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TEMPLATE_BODY_LIMIT as BODY_LIMIT;

    fn parse(yaml: &str) -> serde_yaml::Value {
        serde_yaml::from_str(yaml).expect("valid YAML")
    }

    #[test]
    fn the_minified_template_is_the_same_document() {
        let min = minify(TEMPLATE);
        assert_eq!(parse(&min), parse(TEMPLATE));
        assert!(min.len() < TEMPLATE.len());
    }

    /// The body is the file's document without the console's documentation, and nothing
    /// else is lost: every parameter keeps its type, default, pattern and allowed values.
    #[test]
    fn the_body_is_the_document_without_the_consoles_documentation() {
        let mut want = parse(TEMPLATE);
        let doc = want.as_mapping_mut().expect("a mapping");
        assert!(
            doc.remove("Metadata").is_some(),
            "the file has console metadata"
        );
        let params = doc
            .get_mut("Parameters")
            .and_then(|p| p.as_mapping_mut())
            .expect("parameters");
        let mut described = 0;
        for (_, p) in params.iter_mut() {
            if let Some(p) = p.as_mapping_mut() {
                described += usize::from(p.remove("Description").is_some());
            }
        }
        assert!(described > 40, "{described} parameter descriptions");
        assert_eq!(parse(&body()), want);
    }

    #[test]
    fn console_docs_are_dropped_only_where_they_are_console_docs() {
        let yaml = "\
Description: the stack
Metadata:
  AWS::CloudFormation::Interface:
    ParameterGroups: []
Parameters:
  A:
    Type: String
    Description: >-
      folded
      over lines
    Default: x
  B:
    Description: plain
    Type: Number
Resources:
  R:
    Type: AWS::IAM::Role
    Properties:
      Description: kept
    Metadata:
      kept: true
";
        let out = without_console_docs(yaml);
        assert_eq!(
            out,
            "\
Description: the stack
Parameters:
  A:
    Type: String
    Default: x
  B:
    Type: Number
Resources:
  R:
    Type: AWS::IAM::Role
    Properties:
      Description: kept
    Metadata:
      kept: true
"
        );
    }

    #[test]
    fn the_minified_template_fits_in_a_request_body_with_room_to_spare() {
        let len = body().len();
        // Room for the next feature; past this, the template goes to S3 (TemplateURL).
        let spare = 2_048;
        assert!(
            len + spare <= BODY_LIMIT,
            "the template body is {len} bytes; CloudFormation takes {BODY_LIMIT} and we keep {spare} spare"
        );
    }

    #[test]
    fn block_scalars_keep_their_comment_and_blank_lines() {
        let yaml = "\
# top comment
A:
  # a comment
  UserData:
    Fn::Base64: !Sub |
      #!/bin/sh
      # kept: part of the value

      X=1
  Other: >-
    folded
    # kept too
  # dropped
  - |
    #x
B: 1 # trailing comments stay
";
        let min = minify(yaml);
        assert!(
            min.contains("      #!/bin/sh\n      # kept: part of the value\n\n      X=1\n"),
            "{min}"
        );
        assert!(min.contains("    # kept too\n"), "{min}");
        assert!(min.contains("    #x\n"), "{min}");
        assert!(
            !min.contains("top comment") && !min.contains("a comment") && !min.contains("dropped"),
            "{min}"
        );
        assert!(min.contains("B: 1 # trailing comments stay"), "{min}");
    }

    #[test]
    fn the_user_data_keeps_its_shebang_and_comment() {
        let min = body();
        assert!(min.contains("#!/bin/sh\n"), "user data lost its shebang");
        assert!(min.contains("# agent-fleet: read by agent-supervisor as KEY=VALUE lines"));
    }
}
