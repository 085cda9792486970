"""Pictures: loss curves (``loss``); pipeline timelines and plans add theirs here. Matplotlib is
imported inside each function (Agg backend), so importing paratrain stays light."""
