"""The Dify daemon dialect: routes and shapes that let an unmodified Dify use plugind.

The core never imports this package.
"""
