"""Sphinx configuration: the API reference from the docstrings, the Markdown pages, the notebooks.

Build from the repository root (warnings are errors, as in CI):

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import optax_sam  # noqa: E402

project = 'optax_sam'
author = 'The optax_sam authors'
copyright = '2026, The optax_sam authors'  # noqa: A001
release = optax_sam.__version__
version = release

extensions = [
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',
  'sphinx.ext.napoleon',  # Google-style Args:, Returns:, Example:, References:
  'sphinx.ext.mathjax',  # the .. math:: blocks of the docstrings
  'sphinx.ext.viewcode',
  'myst_nb',  # Markdown pages (MyST) and notebooks
]

# The notebooks live in notebooks/ (Colab links point there), committed without outputs. The site
# renders the copies that docs/execute_notebooks.py ran at full settings (docs/executed_notebooks/,
# with their outputs); tests/integration/test_notebooks.py checks that each copy has its notebook's
# cells, and executes the notebooks themselves on small settings. Nothing is executed here.
NOTEBOOKS = DOCS / 'notebooks'
EXECUTED = DOCS / 'executed_notebooks'
shutil.rmtree(NOTEBOOKS, ignore_errors=True)
NOTEBOOKS.mkdir()
for path in sorted((ROOT / 'notebooks').glob('*.ipynb')):
  executed = EXECUTED / path.name
  shutil.copy(executed if executed.exists() else path, NOTEBOOKS / path.name)
nb_execution_mode = 'off'

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb', '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', 'README.md', 'executed_notebooks']
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3

autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_typehints = 'none'  # the Args sections say what each argument is
autodoc_member_order = 'bysource'
autodoc_default_options = {'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # the Attributes sections say what each field holds
# A class page is its docstring: the states are NamedTuples, whose tuple methods and
# "Alias for field number" entries would only repeat the Attributes section.
templates_path = ['_templates']

html_theme = 'furo'
html_title = f'optax_sam {release}'

# docs/benchmarks.md nests the generated tables (####) under a ## section, which reads well on
# GitHub; MyST would warn about the skipped level.
suppress_warnings = ['myst.header']
