#!/usr/bin/env python3
"""Validates profile files against the JSON Schema embedded in profiles/README.md.

usage: check_schema.py README.md PROFILE.json...   (prints one line per file, exit 1 on any failure)
"""
import json
import re
import sys

import jsonschema

readme = open(sys.argv[1]).read()
schema = json.loads(re.search(r"## JSON Schema.*?```json\n(.*?)```", readme, re.S).group(1))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
failed = False
for path in sys.argv[2:]:
    errors = sorted(validator.iter_errors(json.load(open(path))), key=str)
    print("%s: %s" % (path, "ok" if not errors else errors[0].message))
    failed |= bool(errors)
sys.exit(1 if failed else 0)
