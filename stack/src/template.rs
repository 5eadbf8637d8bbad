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
    minify(TEMPLATE)
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
        let min = body();
        assert_eq!(parse(&min), parse(TEMPLATE));
        assert!(min.len() < TEMPLATE.len());
    }

    #[test]
    fn the_minified_template_fits_in_a_request_body_with_room_to_spare() {
        let len = body().len();
        // 1 KiB: the logs' parameters, log group and statement (issue 14) took 820 bytes of
        // the 2 KiB this kept; past this, the template goes to S3 (TemplateURL) instead.
        let spare = 1_024;
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
