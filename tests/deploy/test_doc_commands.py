"""Every helm command the docs show is run as written (as `helm template`), and every values
example of the chart's README renders.

A command is a line of a ```sh block starting with `helm install`, `helm upgrade` or
`helm template`, joined with its `\\` continuations; one with a `...` placeholder is skipped.
It runs from a scratch directory where `helm/` is the repository's and each file a
`--set-file` names exists (a generated RSA public key). Besides rendering, each `--set`
value must reach the manifests as given (after helm's own unescaping): a value that helm
split at a comma or read as something else fails here, not in a user's cluster.

Usage: python3 test_doc_commands.py HELM REPO
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import unittest

HELM, REPO = sys.argv[1], sys.argv[2]
DOCS = ["README.md", "docs/OPERATIONS.md", "helm/roomcast/README.md"]


def shell_blocks(text):
    return re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S)


def helm_commands(path):
    text = open(os.path.join(REPO, path), encoding="utf-8").read()
    found = []
    for block in shell_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if re.match(r"helm (install|upgrade|template)\b", line) and "..." not in line:
                found.append(line)
    return found


def values_examples(path):
    """YAML blocks whose top-level keys are all keys of the chart's values.yaml."""
    chart_keys = set(
        re.findall(r"^(\w+):", open(os.path.join(REPO, "helm/roomcast/values.yaml")).read(), re.M)
    )
    text = open(os.path.join(REPO, path), encoding="utf-8").read()
    examples = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        keys = set(re.findall(r"^(\w+):", block, re.M))
        if keys and keys <= chart_keys:
            examples.append(block)
    return examples


def set_values(args):
    """The values of `--set k=v` as helm reads them: `\\,` is a comma."""
    values = []
    for flag, arg in zip(args, args[1:]):
        if flag == "--set":
            for pair in re.split(r"(?<!\\),", arg):
                values.append(pair.split("=", 1)[1].replace("\\,", ","))
    return values


class DocCommands(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.mkdtemp(prefix="doc-commands-")
        os.symlink(os.path.join(REPO, "helm"), os.path.join(cls.scratch, "helm"))
        cls.key = os.path.join(cls.scratch, "generated.key")
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", cls.key], check=True, capture_output=True)

    def public_key_at(self, name):
        path = os.path.join(self.scratch, name)
        if not os.path.exists(path):
            subprocess.run(["openssl", "pkey", "-in", self.key, "-pubout", "-out", path],
                           check=True, capture_output=True)

    def render(self, args):
        for flag, arg in zip(args, args[1:]):
            if flag == "--set-file":
                self.public_key_at(arg.split("=", 1)[1])
        done = subprocess.run([HELM, "template"] + args, cwd=self.scratch,
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, f"helm template {shlex.join(args)}:\n{done.stderr}")
        return done.stdout

    def test_every_documented_helm_command_renders_with_its_values(self):
        commands = [(doc, c) for doc in DOCS for c in helm_commands(doc)]
        self.assertGreaterEqual(len(commands), 2, "the docs show helm install commands")
        for doc, command in commands:
            with self.subTest(doc=doc, command=command):
                args = shlex.split(command)[2:]
                manifests = self.render(args)
                for value in set_values(args):
                    self.assertIn(value, manifests, f"--set value {value!r} not rendered")

    def test_every_values_example_of_the_chart_readme_renders(self):
        examples = values_examples("helm/roomcast/README.md")
        self.assertGreaterEqual(len(examples), 1)
        for n, example in enumerate(examples):
            with self.subTest(example=n):
                path = os.path.join(self.scratch, f"example-{n}.yaml")
                with open(path, "w") as f:
                    f.write(example)
                self.render(["roomcast", "helm/roomcast", "-f", path])


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=1)
