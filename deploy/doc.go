// Package deploy holds what operators load into their own monitoring, beside the appliance: the
// Grafana dashboard (grafana/) and the Prometheus scrape configuration (prometheus/). Its tests
// keep both in line with what a running appliance exports.
package deploy
