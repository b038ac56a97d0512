"""What people look at: ``images`` (PNGs, flicker GIFs, difference maps, strips), ``gallery`` (index.html),
``quiz`` and ``study`` pages, ``templates/`` (their HTML, CSS and JavaScript)."""
