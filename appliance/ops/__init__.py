"""Operations on the installed appliance: install, update, service control, logs."""
