package proxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
)

// BenchmarkPlainHTTPForwardKeepAlive measures plain-HTTP requests per second through the
// explicit listener from a keep-alive client (Go's http.Client with a proxy, as most HTTP
// libraries behave), each request authenticated, decided and logged on its own.
func BenchmarkPlainHTTPForwardKeepAlive(b *testing.B) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	f := start(b, loopPolicy)
	proxyURL := &url.URL{Scheme: "http", Host: f.addr, User: url.UserPassword("k1", "x")}
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL), MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		resp, err := client.Get(up.URL + "/x")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
}
