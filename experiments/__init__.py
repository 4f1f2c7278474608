"""Small-scale reproductions of the papers (not part of the installed package); run from the repository root with
`python -m experiments.NAME`."""
