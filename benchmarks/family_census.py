"""Which library modules name each family's own words, comments and docstrings aside (issue 27's measure).

  python benchmarks/family_census.py [ROOT]    # ROOT: a checkout (default: this one); e.g. an old commit's
                                               # `git archive <commit> repvgg_jax | tar -x -C /tmp/old`
"""

import io
import os
import re
import sys
import tokenize

WORDS = {"MobileOne": r"rbr_conv|rbr_scale|rbr_skip|MobileOne|mobileone",
         "QARepVGG": r"QARepVGG|qarepvgg|quantization_friendly",
         "RepVGGplus": r"post_se|stage3_first|stage3_second|AUX_SUFFIX|RepVGGplus|repvggplus",
         "RepViT": r"RepViT|repvit|token_mixer|channel_mixer"}
_LINE_START = (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL)


def code_only(source: str) -> str:
  """The source's tokens without comments and docstrings (string statements), joined by spaces."""
  kept, previous = [], tokenize.NEWLINE
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    docstring = token.type == tokenize.STRING and previous in _LINE_START
    if token.type != tokenize.COMMENT and not docstring:
      kept.append(token.string)
    previous = token.type
  return " ".join(kept)


def main(root: str) -> None:
  library = os.path.join(root, "repvgg_jax")
  code = {}
  for name in sorted(f for f in os.listdir(library) if f.endswith(".py")):
    with open(os.path.join(library, name)) as f:
      code[name[:-3]] = code_only(f.read())
  print("| family | modules naming it |\n|---|---|")
  for family, words in WORDS.items():
    modules = [m for m, text in code.items() if re.search(words, text)]
    print(f"| {family} | {len(modules)}: {', '.join(modules)} |")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
