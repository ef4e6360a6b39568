"""Keeps pytest (which runs with --doctest-modules) out of this folder.

generate.py imports torch and the authors' files, which the test environment lacks; they
are run by hand with a separate torch environment (see README.md), not collected.
"""

collect_ignore = ['generate.py', 'generate_bsam.py', 'vendor.py']
