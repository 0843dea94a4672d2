"""Prints pip constraints pinning every dependency of pyproject.toml (extras included) to its lower bound, so the
oldest CI job runs exactly the versions pyproject promises to work with."""

import re
import tomllib

with open("pyproject.toml", "rb") as f:
  project = tomllib.load(f)["project"]
requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
for requirement in dict.fromkeys(requirements):  # Once each, though several extras may ask for it.
  match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([0-9][^,;]*)", requirement.replace(" ", ""))
  if match and match.group(1) != project["name"]:
    print(f"{match.group(1)}=={match.group(3)}")
  elif not requirement.startswith(project["name"]):
    raise SystemExit(f"{requirement!r} has no plain lower bound (name>=version); CI pins each one.")
