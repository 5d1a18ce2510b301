"""One module per dashboard panel. Each panel class has `parts` (the state parts it draws),
`layout` (its Bokeh model) and `refresh(state)`, called only from the document's own callbacks."""
