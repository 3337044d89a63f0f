"""The package's shape rules (DEVELOPERS.md): no function in nfnets/ over 90
code lines, no file over 500 lines, no import circle between its modules.
Read from the source with `ast`; nothing is imported."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'nfnets'
MAX_FUNCTION_CODE_LINES = 90
MAX_FILE_LINES = 500


def _modules():
  """{dotted module name: path} of every file in the package."""
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _code_lines(node, lines):
  """Lines of a function that are neither blank, comments nor its
  docstring (nested functions count towards the outer one)."""
  first = node.lineno
  body = node.body
  if (body and isinstance(body[0], ast.Expr)
      and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)):
    skip = range(body[0].lineno, body[0].end_lineno + 1)
  else:
    skip = range(0)
  return sum(1 for n in range(first, node.end_lineno + 1)
             if n not in skip and lines[n - 1].strip()
             and not lines[n - 1].strip().startswith('#'))


def _top_level_imports(tree, modules, name):
  """Modules of the package this module imports when it is imported."""
  found = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      targets = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    found.update(t for t in targets if t in modules and t != name)
  return found


def _cycle(graph):
  """One import circle as a list of modules, or None. A package and its own
  submodules are not a circle (the package imports what it re-exports)."""
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for dep in sorted(graph[module]):
      if dep.startswith(module + '.') or module.startswith(dep + '.'):
        continue
      if state.get(dep) == 'open':
        return path[path.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, path + [dep])
        if found:
          return found
    state[module] = 'done'
    return None

  for module in sorted(graph):
    if module not in state:
      found = visit(module, [module])
      if found:
        return found
  return None


@pytest.fixture(scope='module')
def parsed():
  return {name: (path, path.read_text()) for name, path in _modules().items()}


def test_functions_and_files_are_short(parsed):
  long_functions, long_files = [], []
  for name, (path, text) in parsed.items():
    lines = text.splitlines()
    if len(lines) > MAX_FILE_LINES:
      long_files.append(f'{path.name}: {len(lines)} lines')
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        count = _code_lines(node, lines)
        if count > MAX_FUNCTION_CODE_LINES:
          long_functions.append(f'{name}.{node.name}: {count} code lines')
  assert not long_functions, long_functions
  assert not long_files, long_files


def test_no_import_circles(parsed):
  modules = set(parsed)
  graph = {name: _top_level_imports(ast.parse(text), modules, name)
           for name, (_, text) in parsed.items()}
  assert sum(map(len, graph.values())) > 50  # the graph was really read
  circle = _cycle(graph)
  assert circle is None, ' -> '.join(circle)


def test_the_checks_catch_what_they_guard():
  text = 'def f():\n  """Doc\n  string."""\n' + '  x = 1\n  # c\n\n' * 95
  node = ast.parse(text).body[0]
  assert _code_lines(node, text.splitlines()) == 96  # def line + 95 bodies
  graph = {'p.a': {'p.b'}, 'p.b': {'p.c'}, 'p.c': {'p.a'}, 'p': {'p.a'}}
  assert _cycle(graph) == ['p.a', 'p.b', 'p.c', 'p.a']
  assert _cycle({'p': {'p.a'}, 'p.a': {'p'}}) is None
