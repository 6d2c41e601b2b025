"""A GitHub client (PyGithub) through Till's gateway, with a Till token in place of a PAT.

    export GH_TILL_TOKEN=$(till mint github --allow 'GET /repos/acme/**' --uses 10)
    python github.py

GitHub clients send `Authorization: token <key>`; Till reads the token there and injects the real one.
The github preset's ceiling is read-only (`GET /**`); widen it in till.toml for writes.
"""
import os

from github import Auth, Github

gh = Github(base_url="http://127.0.0.1:8719/proxy/github", auth=Auth.Token(os.environ["GH_TILL_TOKEN"]))
repo = gh.get_repo("acme/till")
for issue in repo.get_issues(state="open")[:5]:
    print(issue.number, issue.title)
