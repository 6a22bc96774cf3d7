"""flambeau-example-plugin: a route and a batching strategy, the template for plugin authors.

:mod:`flambeau_example.plugin` holds the hook implementations flambeau calls,
:mod:`flambeau_example.echo` the ``/example/echo`` route and :mod:`flambeau_example.deadline`
the ``deadline`` batching strategy. Importing the package does nothing else.
"""
