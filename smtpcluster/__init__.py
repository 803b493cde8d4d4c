"""smtpcluster: the SMTP relay (config, node wiring, front ends, delivery, admin)."""
