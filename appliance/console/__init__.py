"""The web console's static files (package data, served by appliance.http.console)."""
